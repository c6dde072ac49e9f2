"""Real HTTP servers on 127.0.0.1 that tests start and stop: a scriptable faulty
OpenAI-compatible endpoint, a static document server, and the llama-cpp-python server."""
