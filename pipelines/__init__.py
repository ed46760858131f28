"""Ray Data stages of the platform: the feature cache build (`pipelines.build`)."""
