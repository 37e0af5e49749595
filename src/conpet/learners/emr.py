"""EMR: episodic memory replay (Wang et al. 2019, "Sentence Embedding Alignment for Lifelong
Relation Extraction"; the EMR baseline adapted by ConPET, Song et al. 2023).

After each task, a memory keeps ``memory_per_class`` training rows per class, chosen by k-means
on the model's features (the row nearest each centroid). Original schedule (``emr``): each epoch
of a new task passes over the new rows plus the memory of all old classes. ``emr*`` is EMR on
ConPET's dynamic replay schedule (old rows from the full history by default, as in the official
code; ``replay_source: memory`` replays the memory instead).

Deviation, named: the official code repeats the memory ``ceil(...)`` times per epoch to balance
it against the new data; here the memory is passed over once per epoch.
"""

from __future__ import annotations

from conpet.learners.static import Plugin, register_method


@register_method
class EMR(Plugin):
    """Episodic memory replay of k-means-selected exemplars (Wang et al. 2019)."""

    generative = True

    name = "emr"
    paper = "Wang et al. 2019, Sentence Embedding Alignment for Lifelong Relation Extraction (NAACL)"
    shards_backbone = True

    def needs_memory(self) -> bool:
        return not self.learner.dynamic or self.opts["replay_source"] == "memory"

    def replay_rows(self, t: int) -> list[int]:
        stream = self.learner.ctx.stream
        return self.learner.memory.rows(stream.memory_keys_through(t - 1))
