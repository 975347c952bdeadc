"""Small utilities: process groups (``dist``), atomic writes (``files``), solver-sweep results (``sweep``)."""
