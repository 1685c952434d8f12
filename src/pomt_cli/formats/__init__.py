"""The files pomt writes and reads: one typed reader/writer per format, atomic output sets."""
