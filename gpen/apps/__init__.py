"""Programs over the library: the command line, its jobs, video files, Ray, benchmarks."""
