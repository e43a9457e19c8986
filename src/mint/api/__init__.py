"""HTTP service plane: the Tinker wire protocol, authentication, futures."""
