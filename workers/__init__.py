"""RQ workers: jobs that turn Bridge events into rows. May import ``service``, never the reverse."""
