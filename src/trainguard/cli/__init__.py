"""The command line: a thin layer over the library (`main()` in `trainguard.cli.main`)."""
