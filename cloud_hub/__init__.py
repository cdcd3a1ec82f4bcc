"""The cloud hub: answers offloaded inputs with the big model and keeps every device's results."""
