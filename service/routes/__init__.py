"""One router per concern: predict, health, bundle."""
