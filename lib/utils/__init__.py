"""Small utilities: process groups (``dist``), atomic writes (``files``), solver-sweep results (``sweep``),
the tools' shared ``--help`` format (``tool_help``)."""
