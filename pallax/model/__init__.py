"""The Gemini-style decoder, training step and generation. Nothing here yet."""
