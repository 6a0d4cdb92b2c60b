"""The shared engine: sites, forms, target matching."""
