"""Checkpoints of other libraries <-> lmmask workdirs. `convert` is the entry
(`--mode=import` and `--mode=export`); `hf` maps Hugging Face checkpoints to
Decoders exactly; `gguf` reads and writes GGUF files. The package itself imports
nothing, so a module of it can be imported without loading the others."""
