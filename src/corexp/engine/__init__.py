"""The engine: model loading, the list-wise prompt, the attention read-out, scoring, the re-ranker (METHOD.md §1-5)."""
