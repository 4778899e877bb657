"""paintsim: which NGA paintings look like this one? A staged, resumable similarity pipeline."""
__version__ = "0.1.0"
