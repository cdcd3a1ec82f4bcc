"""The digits models: an INT8 edge CNN and a larger cloud CNN trained on scikit-learn's digits."""
