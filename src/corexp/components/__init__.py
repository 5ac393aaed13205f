"""Components: one class per option of the groups Hydra instantiates from `_target_` (heads, first stages,
truncation, fusion, detection)."""
