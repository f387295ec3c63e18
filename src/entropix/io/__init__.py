"""Reading model files without an array framework: GGUF, safetensors folders, tokenizers."""
