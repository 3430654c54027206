"""moat's resolver: the asyncio shell around the sans-IO core (see resolver/pipeline.py)."""

__version__ = "0.1.0"
