#!/bin/busybox sh
# /init of the xtnd test guest (busybox initramfs, built by guest.py).
#
# Writes a known pattern to /dev/vda with O_DIRECT, reads it back, checks
# it, prints markers on the serial console and powers off. Parameters come
# from the kernel command line (all optional):
#
#   xtnd.write_mb=N    MiB to write (default 64)
#   xtnd.chunk_mb=N    MiB per dd write/verify unit (default 1)
#   xtnd.rate=N        limit writing to about N MiB/s (default 0: no limit)
#   xtnd.seconds=N     stop writing after about N seconds, even before
#                      write_mb (default 0: no limit); what was written is
#                      verified
#   xtnd.offset_mb=N   start writing at this offset of /dev/vda (default 0)
#   xtnd.verify=0|1    read back and check (default 1)
#   xtnd.hold=0|1      stay up when done instead of powering off (default 0);
#                      the test stops the domain itself
#   xtnd.watch_size=0|1  while holding, print XTND-SIZE sectors=N from
#                      /sys/block/vda/size at once and whenever it changes
#                      (read every 20 ms; a disk grown under the guest)
#
# Every chunk holds one 32-byte line repeated, naming the chunk's offset in
# MiB, so a chunk read back from the wrong place (or not written) differs.
# Markers: XTND-START, XTND-PROGRESS mb=N, XTND-WRITE-DONE,
# XTND-VERIFY-OK / XTND-VERIFY-FAIL chunk=N, XTND-WRITE-FAIL chunk=N,
# XTND-HOLD (done, staying up), XTND-SIZE sectors=N.

/bin/busybox mkdir -p /bin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

finish() {
    sync
    if [ "$hold" = 1 ]; then
        echo "XTND-HOLD"
        if [ "$watch_size" = 1 ]; then
            last=""
            while :; do
                read -r size </sys/block/vda/size
                if [ "$size" != "$last" ]; then
                    echo "XTND-SIZE sectors=$size"
                    last=$size
                fi
                usleep 20000
            done
        fi
        while :; do sleep 3600; done
    fi
    poweroff -f
}

write_mb=64
chunk_mb=1
rate=0
offset_mb=0
verify=1
hold=0
seconds=0
watch_size=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    xtnd.write_mb=*) write_mb=${arg#*=} ;;
    xtnd.chunk_mb=*) chunk_mb=${arg#*=} ;;
    xtnd.rate=*) rate=${arg#*=} ;;
    xtnd.offset_mb=*) offset_mb=${arg#*=} ;;
    xtnd.verify=*) verify=${arg#*=} ;;
    xtnd.hold=*) hold=${arg#*=} ;;
    xtnd.seconds=*) seconds=${arg#*=} ;;
    xtnd.watch_size=*) watch_size=${arg#*=} ;;
    esac
done

for m in $(cat /modules.order); do
    insmod "/lib/modules/$m.ko" || echo "XTND-MODULE-FAIL $m"
done

# virtio_blk probes asynchronously: wait (bounded) for the device node.
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1))
    if [ $n -gt 300 ]; then
        echo "XTND-NO-DISK"
        finish
    fi
    usleep 20000
done

# Pause after each chunk so that writing runs at about $rate MiB/s.
delay_us=0
if [ "$rate" -gt 0 ]; then
    delay_us=$((chunk_mb * 1000000 / rate))
fi

chunk_bytes=$((chunk_mb * 1048576))
nchunks=$((write_mb / chunk_mb))

make_chunk() {
    # printf pads the line to exactly 32 bytes (31 + newline).
    yes "$(printf 'xtnd-mb-%012d-%09d' "$1" "$chunk_mb")" | head -c $chunk_bytes
}

echo "XTND-START write_mb=$write_mb chunk_mb=$chunk_mb rate=$rate offset_mb=$offset_mb seconds=$seconds"
: >/tmp/sums
started=$(date +%s)
i=0
while [ $i -lt $nchunks ]; do
    if [ "$seconds" -gt 0 ] && [ $(($(date +%s) - started)) -ge "$seconds" ]; then
        break
    fi
    mb=$((offset_mb + i * chunk_mb))
    make_chunk $mb >/tmp/chunk
    sum=$(md5sum </tmp/chunk)
    echo "${sum%% *}" >>/tmp/sums
    if ! dd if=/tmp/chunk of=/dev/vda bs=1048576 seek=$mb count=$chunk_mb \
            oflag=direct conv=notrunc 2>/tmp/dd.err; then
        echo "XTND-WRITE-FAIL chunk=$i mb=$mb $(cat /tmp/dd.err)"
        finish
    fi
    i=$((i + 1))
    echo "XTND-PROGRESS mb=$((i * chunk_mb))"
    [ $delay_us -gt 0 ] && usleep $delay_us
done
rm -f /tmp/chunk
echo "XTND-WRITE-DONE mb=$((i * chunk_mb))"

if [ "$verify" = 1 ]; then
    i=0
    ok=1
    while read -r expected; do
        mb=$((offset_mb + i * chunk_mb))
        sum=$(dd if=/dev/vda bs=1048576 skip=$mb count=$chunk_mb iflag=direct 2>/dev/null | md5sum)
        if [ "${sum%% *}" != "$expected" ]; then
            echo "XTND-VERIFY-FAIL chunk=$i mb=$mb"
            ok=0
            break
        fi
        i=$((i + 1))
    done </tmp/sums
    [ $ok = 1 ] && echo "XTND-VERIFY-OK chunks=$i"
fi
finish
