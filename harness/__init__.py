"""Development harnesses that drive a real Label Studio with this backend: the product measured as users run it."""
