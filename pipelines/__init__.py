"""The feature cache build (`pipelines.build`): plan on the driver, Ray tasks and actors compute and write shards."""
