"""Asynchronous edge learning by cloned knowledge distillation (``fedllm edge RECIPE``).

Not a federated round: one core model and a stream of edges that each show up once, train a clone
of the core on their own data and return it as a teacher the core distils from, without the core
ever waiting (the paper's Algorithm 1; see :mod:`.vision`).

- :mod:`.recipe`: the edge recipe (its own YAML, built from :mod:`fedllm.config`'s groups);
- :mod:`.vision`: Algorithm 1 on Fashion-MNIST, its schedule and the synchronous FedAvg baseline;
- :mod:`.lm`: the same loop on one frozen 4-bit base with LoRA clones.

The study and its report are :mod:`fedllm.studies.edge` and :mod:`fedllm.metrics.edge_report`.
"""
