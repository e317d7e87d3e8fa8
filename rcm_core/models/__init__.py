"""Networks (single-device code) and the TrigFlow wrapper that turns any of them into F(x_t, t, cond)."""
