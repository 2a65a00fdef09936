"""HTTP service over furina/ and merger/: merge jobs, generation, OpenAI-compatible API."""
