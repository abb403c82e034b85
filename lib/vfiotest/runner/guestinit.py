"""What runs inside the runner VM before sshd: the initramfs `/init` and the second stage.

`/init` (busybox, in the initramfs) loads the few modules needed to reach the root,
mounts the controller's root (9p, read-only) under a tmpfs overlay, adds the
writable mounts, the kernel's modules from the asset cache, the SSH keys and
config, sets up the network, and switches root to busybox `init`, which runs
STAGE2 once and keeps sshd running (and reaps orphans, as PID 1 must).

Values come from the kernel command line (`vfiotest.*=`), so the initramfs does
not depend on the runner's state directory and can be cached by content.
"""

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
say() { echo "vfiotest-init: [$(cut -d" " -f1 /proc/uptime)] $*"; }
die() { echo "vfiotest-init: FAILED: $*"; echo "vfiotest-init: powering off"; sleep 1; poweroff -f; }

for a in $(cat /proc/cmdline); do
    case "$a" in
        vfiotest.state=*) STATE="${a#*=}" ;;
        vfiotest.modules=*) KMODS="${a#*=}" ;;
        vfiotest.tag=*) TAG="${a#*=}" ;;
        vfiotest.overlay=*) OVSIZE="${a#*=}" ;;
        vfiotest.godebug=*) GODEBUG_VALUE="${a#*=}" ;;
        vfiotest.images=*) IMAGES="${a#*=}" ;;
    esac
done
KVER=$(uname -r)
[ -n "$STATE" ] && [ -n "$KMODS" ] && [ -n "$TAG" ] || die "vfiotest.state, vfiotest.modules, vfiotest.tag missing from the kernel command line"

for k in $(cat /etc/vfiotest-modules); do insmod "$k" || die "insmod $k"; done
say "modules loaded"

mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=mmap "$TAG" /lower || die "mount 9p root $TAG"
mount -t tmpfs -o mode=0755,size="${OVSIZE:-1g}" rootrw /rw || die "tmpfs for the overlay"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || die "overlay root"
R=/newroot
[ -x $R/usr/sbin/sshd ] || die "no /usr/sbin/sshd in the controller's root: install openssh-server"

mount -t tmpfs -o mode=0755,nosuid,nodev run $R/run
mount -t tmpfs -o mode=1777,nosuid,nodev tmp $R/tmp
for d in /var/lib/containers /var/lib/vfiotest /var/log/vfiotest; do
    mkdir -p $R$d && mount -t tmpfs -o mode=0755 vfiotest-rw $R$d || die "tmpfs on $d"
done
# The test image's read-only podman store (podman.image.ensure_store): an ext4 disk, the only
# virtio disk (/dev/vda), mounted read-only, and the storage.conf naming it
if [ -n "$IMAGES" ]; then
    mkdir -p "$R$IMAGES"
    if [ -b /dev/vda ] && [ -f "/lower$STATE/storage.conf" ] && mount -t ext4 -o ro /dev/vda "$R$IMAGES"; then
        mkdir -p $R/etc/containers && cp "/lower$STATE/storage.conf" $R/etc/containers/storage.conf
        say "image store on /dev/vda at $IMAGES"
    else
        say "no image store (no /dev/vda, or no $STATE/storage.conf): podman starts with its own storage only"
    fi
fi
# The runner's boot configuration (its GRUB defaults), kept on the controller across reboots
mount -t 9p -o trans=virtio,version=9p2000.L,rw,cache=none vfiotest-etc-default $R/etc/default \
    || die "mount the runner's /etc/default (9p tag vfiotest-etc-default, $STATE/etc-default)"
# busybox's reboot/poweroff/halt (the controller's are systemctl links; there is no systemd here)
mkdir -p $R/usr/local/sbin
for c in reboot poweroff halt; do ln -sf /run/vfiotest/busybox $R/usr/local/sbin/$c; done
# a syslog for the programs that log there (Kata's runtime): busybox syslogd's 8 MiB ring, read with logread
ln -sf /run/vfiotest/busybox $R/usr/local/sbin/logread
mkdir -p $R/usr/lib/modules/$KVER
mount --bind $R$KMODS $R/usr/lib/modules/$KVER || die "bind the kernel modules from $KMODS"

# The controller's ~/.bashrc may be slow (pyenv init): every SSH command would pay for it.
: > $R/root/.bashrc
echo vfiotest-runner > $R/etc/hostname
hostname vfiotest-runner

mkdir -p -m 0755 $R/run/sshd $R/run/vfiotest
mkdir -p -m 0700 $R/run/vfiotest/ssh
cp /lower$STATE/ssh/host_ed25519_key $R/run/vfiotest/ssh/host_ed25519_key || die "copy the host key from $STATE/ssh"
cp /lower$STATE/ssh/client_ed25519_key.pub $R/run/vfiotest/ssh/authorized_keys || die "copy the client key from $STATE/ssh"
chmod 0600 $R/run/vfiotest/ssh/*
cp /etc/vfiotest-sshd_config $R/run/vfiotest/sshd_config
# the SSH sessions' environment (sshd takes the first SetEnv: the only one is here)
echo "SetEnv PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${GODEBUG_VALUE:+ GODEBUG=$GODEBUG_VALUE}" \
    >> $R/run/vfiotest/sshd_config
cp /etc/vfiotest-stage2 $R/run/vfiotest/stage2
cp /bin/busybox $R/run/vfiotest/busybox
chmod 0755 $R/run/vfiotest/stage2
cat > $R/etc/inittab <<'EOF'
::sysinit:/run/vfiotest/busybox sh /run/vfiotest/stage2
::respawn:/run/vfiotest/busybox syslogd -n -C8192
::respawn:/usr/sbin/sshd -D -e -f /run/vfiotest/sshd_config
EOF

ip link set lo up
ip link set eth0 up || die "no eth0 (virtio-net)"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

say "switching root"
mount --move /dev $R/dev
mount --move /proc $R/proc
mount --move /sys $R/sys
exec switch_root $R /run/vfiotest/busybox init
"""

STAGE2 = r"""
B=/run/vfiotest/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
mount -t mqueue mqueue /dev/mqueue
# cgroups as systemd 252 lays them out: v1 (hybrid) with systemd.unified_cgroup_hierarchy=0
# (or false/no/off), else v2 alone (unified, systemd's default)
CG=unified
for a in $(cat /proc/cmdline); do
    case "$a" in
        systemd.unified_cgroup_hierarchy=0|systemd.unified_cgroup_hierarchy=false|\
        systemd.unified_cgroup_hierarchy=no|systemd.unified_cgroup_hierarchy=off) CG=hybrid ;;
        systemd.unified_cgroup_hierarchy|systemd.unified_cgroup_hierarchy=*) CG=unified ;;
    esac
done
if [ $CG = hybrid ]; then
    mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
    for c in $($B awk '!/^#/ && $4 == 1 {print $1}' /proc/cgroups); do
        mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
    done
    mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
    mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
    mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
else
    mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
fi
echo "vfiotest-stage2: cgroups $CG"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# Drivers: no udev here, so load what the suites use (VFs probe against loaded drivers);
# netfilter, bridge and veth load on demand when podman asks the kernel for them.
echo "vfiotest-stage2: [$(cut -d' ' -f1 /proc/uptime)] loading modules"
case $($B grep -m1 vendor_id /proc/cpuinfo) in
    *AuthenticAMD*) KVM=kvm_amd ;;
    *) KVM=kvm_intel ;;
esac
modprobe -a vfio vfio_pci vfio_iommu_type1 igb igbvf nvme overlay $KVM vhost_vsock vhost_net \
    || echo "vfiotest-stage2: some modules failed to load"
# What a systemd host has and Kata 1.x needs: shared mount propagation (its read-only slave bind
# of the container rootfs sees nothing under a private /), and a syslog socket (kata-runtime logs
# there and fails without one). The log is an 8 MiB ring in the runner (`logread` reads it): a 2 MiB one had lost a
# container's first lines after five Kata containers with debug on.
mount --make-rshared /
mount --make-rshared /run
$B syslogd -C8192 || echo "vfiotest-stage2: syslogd did not start: Kata cannot log (Unix syslog delivery error)"
echo "vfiotest-stage2: [$(cut -d' ' -f1 /proc/uptime)] ready"
"""

SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
HostKey /run/vfiotest/ssh/host_ed25519_key
AuthorizedKeysFile /run/vfiotest/ssh/authorized_keys
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
StrictModes yes
MaxSessions 64
MaxStartups 32:50:100
Subsystem sftp /usr/lib/openssh/sftp-server
"""

# Modules the initramfs loads before the root is mounted (dependencies are added).
INITRAMFS_MODULES = ["virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay", "virtio_rng", "virtio_blk", "crc32c_generic", "ext4"]
