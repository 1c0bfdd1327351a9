"""Extrapolation Merging for causal language models (Lin et al., arXiv 2503.04834), in the framework's terms.

Providers below the runner: :mod:`.world` (the offline world: tokenizer, tiny Llama, SFT checkpoints),
:mod:`.tasks` (its seven instruction tasks), :mod:`.checkpoints` (an SFT run's ``checkpoint-N/`` and their
trainer states), :mod:`.evaluation` / :mod:`.harness` (exact match; lm-evaluation-harness), :mod:`.candidates`
(one live model set in place per search point). :mod:`.pipeline` is the runner ``adamerge experiment=llm_demo``
calls; the merge math is :mod:`adamerge.merging`'s, through the methods' ``weights_merger``.
"""
