"""Builders and servers shared by the tests and the benchmarks (benchmarks import test code from here only).

Three tiny-model sources remain, each for what the others cannot give:
- `tiny`: an untrained random Llama with a one-token-per-character tokenizer and random experts,
  built in milliseconds: merge math, the repository and the local backend, where no answer
  needs to be right.
- `bpe`: the same size of model with a trained byte-level BPE tokenizer and a chat template, in a
  second or two: the provider, the api backend and scoring parity, where multi-character tokens
  and chat routes matter.
- the trained tiny zoo (`evomerge.zoo.ensure_tiny`, the `tiny_zoo` fixture of tests/conftest.py):
  experts that really learned their tasks (two CPU minutes, cached): searches whose quality
  is measured, the demo, the GGUF export.

Servers: `provider` (evomerge's own provider in a thread), `fault_proxy` (faults between the api
client and a provider), `llamacpp_server` (llama.cpp's server in a child process), `ray_fitness`
(picklable evaluator factories for Ray workers and the loopback `DelayServer`).

Fault drivers, shared by tests/faults and benchmarks/reliability.py: `crash` and `held_commit`
(kill -9 inside a journal commit), `paid_kills` and `ray_kills` (kills with paid evaluations or
Ray actors in flight), `api_search` (a search through `fault_proxy`), `fuzz` (hostile requests).
"""
