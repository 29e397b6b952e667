"""The vLLM engines (in process, Ray actors, lockstep pairs, a teacher server), their generators and
the patches of vLLM internals they rely on."""
