"""cadenza's runnable services (broker, recorder) and the ``cadenza`` command line."""
