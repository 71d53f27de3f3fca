"""Benchmark evaluation of a checkpoint: an lm-evaluation-harness model and its helpers.

* `lm.LladaJaxLM`: the `lm_eval` model registered as ``llada_jax`` (Monte Carlo likelihoods,
  ELBO of whole texts, generation with the project's sampler);
* `batching`: requests sorted by length and grouped into fixed-shape buckets (few compiles);
* `cache.RequestCache`: finished requests on disk, so an interrupted evaluation resumes;
* `presets`: the official per-task settings of `configs/eval/` with the published numbers.

`lm_eval` is an optional dependency (the ``eval`` extra): only `lm` imports it.
"""
