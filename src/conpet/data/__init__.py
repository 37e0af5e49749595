"""Task streams: rows, tasks, streams, file formats, prompt templates and built-in benchmarks."""

from conpet.data.stream import Row, Stream, Task
from conpet.data.load import load_stream

__all__ = ["Row", "Stream", "Task", "load_stream"]
