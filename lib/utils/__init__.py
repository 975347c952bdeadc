"""Small utilities: process-group bookkeeping (``dist``) and reading solver-sweep results (``sweep``)."""
