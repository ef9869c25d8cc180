"""Image providers: one module per protocol over one shared transport."""
