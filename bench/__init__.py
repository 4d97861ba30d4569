"""innkeeper's benchmark: innkeeper against llama.cpp's llama-server, same model, same run."""
