"""The ground floor: helpers that every other module may import, and that import none of them."""
