"""Stage 3: fitting the CVAE and the classifier into self-contained run folders."""
