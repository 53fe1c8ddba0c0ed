"""Load tests and benchmarks: Locust traffic, concurrency sweeps, the side-by-side benchmark. They speak HTTP only."""
