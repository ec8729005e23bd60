"""The symbolic pickle machine (`machine`), what its events mean (`analysis`), and how
imported names are classified (`names`)."""
