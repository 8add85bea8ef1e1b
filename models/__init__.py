"""What offline jobs and the online service both compute: one implementation, equal features."""

__version__ = "0.1.0"
