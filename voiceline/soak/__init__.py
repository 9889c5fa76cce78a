"""`make soak`: churn a real service with many short calls and watch what it holds (see runner)."""
