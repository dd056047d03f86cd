"""The ``bridgehook`` command: runs the receiver and workers and carries the ops tools."""
