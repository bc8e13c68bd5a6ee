"""Serving moepress outputs in inference engines.

- `vllm_plugin`: the entry point vLLM loads (`vllm.general_plugins`); it registers one vLLM model
  per `Moepress<Family>ForCausalLM` architecture, without importing vLLM's model code until used.
- `vllm_models`: those models (imported only inside vLLM): the family's own vLLM model, with the
  layers a moepress checkpoint lists served on vLLM's FusedMoE (remapped experts and per-layer
  expert counts, in Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE) or by moepress's block of that kind
  as an opaque op (every other kind and family).
"""
