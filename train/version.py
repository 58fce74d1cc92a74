"""The version of noisymix (see CHANGELOG.md); written into every run folder's config.yaml and final.json."""
__version__ = "0.2.0"
