"""mqa_flax: multi-query, grouped-query and multi-head attention Transformers in Flax NNX."""
