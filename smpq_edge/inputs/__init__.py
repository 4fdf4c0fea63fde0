"""The inputs: board profiles, data sets and their preprocessing, tasks, policies, models."""
