"""The ``kvferry`` command line: ``main`` wires up one module per subcommand."""
