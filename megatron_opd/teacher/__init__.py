"""Teacher engines: SGLang scorer and in-process forward behind one interface."""
