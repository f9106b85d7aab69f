"""The narrated scenario behind ``make run``: the guide, told on real processes.

Each chapter is a coroutine taking the ``Scene``; later parts of the cluster add
chapters to ``CHAPTERS`` in ``__main__``.
"""
