"""The online service: a FastAPI app that runs the gate of one bundle behind dynamic batching."""
