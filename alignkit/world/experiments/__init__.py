"""The world's experiments, in run order. Each module defines NAME, SUMMARY (one line: what it shows), MINUTES
(minutes per seed on 2 cores per preset, beyond the shared stages it reuses), ESTIMATED (the presets whose
MINUTES are estimated from the stages' costs rather than measured), run(ctx) -> its results.json section, and
report(section) -> markdown for one seed's section or the aggregate's."""

from __future__ import annotations

from types import ModuleType

from alignkit.world.experiments import (cai, data_selection, distillation, dpo_family, knowledge_categories, ladder,
                                       length_bias, rlaif, safety_dose, self_reward, training_free,
                                       unknown_facts)

EXPERIMENTS: dict[str, ModuleType] = {m.NAME: m for m in (ladder, dpo_family, length_bias, rlaif, cai, self_reward,
                                                          unknown_facts, knowledge_categories, data_selection,
                                                          safety_dose, distillation, training_free)}
