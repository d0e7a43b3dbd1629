"""Pieces both training methods' heads use (Partial FC's operator and FFC's class queue); neither method
imports the other.

    collective_input.py  every rank's inputs gathered in one allgather and checked the same way on every rank
    rows.py              row normalisation, its backward, and reusable scratch buffers
    margin.py            the combined margin s*(cos(m1*theta+m2)-m3) on target cosines, and its derivative
"""
